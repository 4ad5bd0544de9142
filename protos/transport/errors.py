"""The one error of the data plane: a transfer that could not happen on its transport."""


class TransferError(RuntimeError):
    """The bytes of one image could not move on the negotiated transport. A sender then sends them inline; a
    receiver fails the call (its bytes are lost) with a message that names the transport."""
