"""pagedkv."""
