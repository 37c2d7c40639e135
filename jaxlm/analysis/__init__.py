"""Reading what runs wrote (metrics.jsonl, sweep folders) into tables and plots. Imports no
model or training code, so summaries rebuild anywhere from the files alone."""
