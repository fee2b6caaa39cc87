"""Limits shared by the page and the CLI (which must not import Streamlit to read them)."""

MAX_UPLOAD_MB = 50
# A query image from the CLI (--image, caption FILE) is read up to the page's upload cap: the same images
# work in both, and `--image /dev/zero` cannot fill memory.
MAX_QUERY_IMAGE_BYTES = MAX_UPLOAD_MB * 1024 * 1024
# The page's text boxes: CLIP reads 77 tokens, so a few hundred characters already say all it sees.
MAX_QUERY_CHARS = 1000
