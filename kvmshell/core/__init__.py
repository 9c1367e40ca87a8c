"""Everything that is not a user interface. Never imports textual, prompt_toolkit or rich."""
