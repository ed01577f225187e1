"""Tailscale's limits on the authority (tka/limits.go, key.go, tka.go), kept identical so that a chain
one side accepts is never refused by the other."""

MAX_DISABLEMENT_VALUES = 32
MAX_KEYS = 512
MAX_META_BYTES = 512
MAX_KEY_VOTES = 4096

# Iteration bounds when walking the chain; they also bound the work a hostile peer can cause.
MAX_SYNC_ITER = 2000
MAX_SYNC_HEAD_INTERSECTION_ITER = 1000
MAX_SCAN_ITERATIONS = 2000

# A checkpoint AUM is emitted when the chain since the last one reaches this length (builder.go).
CHECKPOINT_EVERY = 50

# Decoder limits (tka.go cborDecOpts).
MAX_NESTED_LEVELS = 16
MAX_ARRAY_ELEMENTS = 4096
MAX_MAP_PAIRS = 1024

# Not in Tailscale (its decoder reads whatever the transport delivers): a bound on one encoded AUM or
# signature, so a hostile sender cannot make us decode megabytes. A checkpoint with 512 keys carrying
# full metadata stays well under it.
MAX_ENCODED_BYTES = 512 * 1024

DISABLEMENT_LENGTH = 32
ED25519_PUBLIC_SIZE = 32
ED25519_SIGNATURE_SIZE = 64
