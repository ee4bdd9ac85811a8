"""The ways people use the engine, built over its core (`engine.load`, `LLM`) and never below it:
the command line (cli), the chat of `run` (repl), and the API shaped like the `ollama` package
(api), which the HTTP server will share."""
