"""Python node targets for the benchmarks."""


def noop() -> None:
    return None
