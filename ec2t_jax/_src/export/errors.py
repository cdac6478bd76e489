"""The export wing's one error type: a packed file, record or symbol stream is not valid."""


class ExportFormatError(ValueError):
  """A packed file (or stream) is not valid: wrong magic or version, truncated, corrupted.

  Raised, in one line, by the container (:mod:`container`), every record codec
  (:mod:`record_codecs`) and every symbol coder (:mod:`symbol_coding`).
  """
