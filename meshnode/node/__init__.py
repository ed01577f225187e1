"""The node daemon and its CLI: control client, network map, DNS, LocalAPI, OS DNS configuration."""
