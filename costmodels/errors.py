"""The one exception type every meshplan package raises for user mistakes."""


class MeshplanError(ValueError):
    """A user-facing error: its message is one line naming the field and the fix.

    The CLI prints it as `meshplan: error: <message>` and exits with status 2.
    """
