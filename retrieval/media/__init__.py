"""Bytes -> pixels: decoding (CPU and nvJPEG), EXIF facts, thumbnails; shared by indexing and query images."""
