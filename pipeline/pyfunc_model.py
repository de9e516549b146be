"""The MLflow pyfunc of a registered lmforge model ("models from code": nothing is pickled).

MLflow stores this file with the model and runs it when the model is loaded, so the model
is a script plus files, never a pickled torch module. The artifacts are one model package
(pipeline/textgen.py): the safetensors weights, the tokenizer and the resolved config.

    mlflow models serve -m models:/lmforge-gpt@champion --env-manager local -p 5001
    curl -s localhost:5001/invocations -H 'Content-Type: application/json' \\
        -d '{"inputs": ["once upon a time"], "params": {"max_new_tokens": 20}}'

Do not import this module from library code: its last line registers the model with MLflow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel, PythonModelContext

from pipeline.textgen import GenerationParams, TextGenerator

PACKAGE_ARTIFACT = "package"  # the artifacts key of the model package folder
DEFAULTS_FILE = "generation_defaults.json"  # in the package: register.decoding at log time


class LmforgeTextModel(PythonModel):
    """predict(list of prompts, params) -> list of generated texts, one per prompt."""

    def load_context(self, context: PythonModelContext) -> None:
        folder = Path(context.artifacts[PACKAGE_ARTIFACT])
        defaults_path = folder / DEFAULTS_FILE
        defaults = GenerationParams.from_mapping(
            json.loads(defaults_path.read_text()) if defaults_path.is_file() else {}
        )
        self.generator = TextGenerator.from_folder(folder, defaults=defaults)

    def predict(
        self,
        context: PythonModelContext | None,
        model_input: list[str],
        params: dict[str, Any] | None = None,
    ) -> list[str]:
        return self.generator.complete(list(model_input), params)


mlflow.models.set_model(LmforgeTextModel())
