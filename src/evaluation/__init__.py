"""``hpi eval``: lm-evaluation-harness on hpi's serving runtime, and the offline tasks the repository keeps."""
