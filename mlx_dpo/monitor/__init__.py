"""What watches a run: callbacks, live trackers, health warnings, performance figures."""
