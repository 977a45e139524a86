"""The error types every stage shares."""


class LeakageError(RuntimeError):
    """A stage was about to read a volume or a label it must never see (a test subject's, or one of a part outside
    the parts it may read): splits are by subject and family, and no test subject reaches training."""
