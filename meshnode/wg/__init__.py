"""The WireGuard-protocol data plane: Noise IKpsk2 handshake, transport, timers, TUN/UDP glue."""
