"""The model tools' one error: an input they cannot use, or a step that failed, said for the user (the CLI prints
it after the command's name and exits 2)."""


class ExportError(RuntimeError):
    pass
