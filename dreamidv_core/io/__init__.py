"""Safe file I/O: weight files read lazily without running pickles, atomic writes, video files."""
