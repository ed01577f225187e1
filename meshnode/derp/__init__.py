"""DERP, Tailscale's relay protocol: frame codec and login state machines (`frames`, `session`), the relay
server (`server`), the client a node uses (`client`) and the `meshnode derp` command (`cli`)."""
