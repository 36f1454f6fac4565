"""From a request to the rows the engine decodes: prompt checks, chat templates and the terminal
chat's conversation, stop strings, a row's text, and the depth a row speculates at. Above the
artifact and the engine, below the Python API (``mtplx.api``) that strings them together."""
