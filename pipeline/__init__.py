"""lmforge: the library the stages call, in packages named for lifecycle steps (see README)."""
