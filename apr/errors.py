"""Exception classes. Every message is one line that names what is wrong and where;
the CLI prints it as ``error: <message>`` and exits with code 2."""


class AprError(Exception):
    """Base class for every error this package raises on bad input."""


class FormatError(AprError):
    """A file is not what it claims to be: bad magic, bad CRC, truncated, inconsistent."""


class ChecksumError(FormatError):
    """A CRC32 does not match (header or footer)."""


class UnsupportedError(AprError):
    """A valid file uses something this tool cannot express (an architecture, a dtype...)."""


class ConfigError(AprError):
    """Model configuration is missing, inconsistent or implausible."""


class OutputExistsError(AprError):
    """Refusing to overwrite an existing output without --force."""


class AprWarning(UserWarning):
    """Something a file does that the tool follows but the user should know (one line; the
    CLI prints it as ``warning: <message>``)."""
