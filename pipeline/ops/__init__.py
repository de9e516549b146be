"""Operations: MLflow tracking, the stage runner, the workspace lock, reproduce, the launcher."""
