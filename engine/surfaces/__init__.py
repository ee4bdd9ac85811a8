"""The ways people use the engine beyond the command line (engine/cli.py, where installed console
scripts find it), built over its core (`engine.load`, `LLM`) and never below it: the chat of `run`
(repl) and the API shaped like the `ollama` package (api), which the HTTP server will share."""
