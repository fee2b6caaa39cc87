"""The Streamlit page (imports retrieval only)."""
