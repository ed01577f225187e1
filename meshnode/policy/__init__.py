"""The ACL policy: Tailscale's policy-file format (HuJSON), its evaluation and its `tests` section."""
