"""Limits shared by the page and `crossmodal ui` (which must not import Streamlit to read them)."""

MAX_UPLOAD_MB = 50
