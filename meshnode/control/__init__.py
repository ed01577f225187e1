"""The coordination (control) server: users, nodes, keys, names, addresses, policy, DNS settings."""
