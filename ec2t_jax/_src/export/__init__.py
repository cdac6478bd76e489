"""The export wing: the container format, record codecs, symbol coders, file I/O."""
