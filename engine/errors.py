"""The one exception type users see: a clear message about what is wrong with their input."""


class EngineError(ValueError):
    """Bad input: a model file, a config, a prompt or an option that the engine cannot use."""


class ModelNotFound(EngineError):
    """No model by that name here (a server answers 404)."""
