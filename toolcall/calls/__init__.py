"""The tool-call language: schemas, prompts, parsing, BFCL's AST scoring, constrained decoding."""
