"""Looking at data and runs: lint, audit, report, plan."""
