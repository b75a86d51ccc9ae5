"""The search service's request limits, defined once: the service enforces them and the
client splits its requests by them. Imports nothing, so the CLI can read them quickly."""

MAX_BODY_BYTES = 1 << 20  # a search request's body, token included
MAX_K = 100  # nearest images per query
MAX_QUERIES = 64  # queries per token (one request)
