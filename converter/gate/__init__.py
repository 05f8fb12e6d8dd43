"""Gate: what a file must pass before anyone ships it (accuracy, contract, ORT load tests)."""
