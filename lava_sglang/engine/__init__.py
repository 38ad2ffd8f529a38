"""Everything that touches SGLang internals: hooks, start-up checks, capture, repack, decode, release."""
