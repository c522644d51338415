"""Generation and scoring of what a model answers, in one or several processes; scaffolds."""
