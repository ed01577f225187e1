"""STUN (RFC 5389 binding requests and responses), byte-compatible with Tailscale's net/stun:
the codec (`message`), a UDP server (`server`) and a client helper (`client`)."""
