"""Error messages as one line, for the command-line tools' `error: ...` output."""


def one_line(error: BaseException, limit: int | None = 300) -> str:
    """An error's message as one line, cut at `limit` characters (some list hundreds of keys; None: never).

    That is its first line, except for an error re-raised from a DataLoader worker, whose message is
    the worker's traceback: then the original error's message, which the traceback ends with.
    """
    text = str(error).strip() or type(error).__name__
    if '\nOriginal Traceback' in text:
        last = text.splitlines()[-1]  # "module.ErrorType: message"
        text = last.partition(': ')[2] or last
    text = text.splitlines()[0]
    return text if limit is None or len(text) <= limit else text[:limit] + ' ...'
