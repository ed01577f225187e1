"""Tailscale's disco protocol: the sealed ping/pong/call-me-maybe messages that find and keep
direct paths between nodes (byte-compatible with tailscale's disco/disco.go).

`messages` is the codec of the plaintext messages, `box` the sealed wrapper (magic, the sender's
disco key, a nonce and a NaCl box) around them."""

from .box import DiscoKey, PeerBox, looks_like_disco, sender_key
from .messages import (MAGIC, CallMeMaybe, DiscoError, Message, MessageType, Ping, Pong, decode,
                       encode)

__all__ = ["MAGIC", "CallMeMaybe", "DiscoError", "DiscoKey", "Message", "MessageType", "PeerBox",
           "Ping", "Pong", "decode", "encode", "looks_like_disco", "sender_key"]
