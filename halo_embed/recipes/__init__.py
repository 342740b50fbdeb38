"""Training programs (recipes). Each imports its heavy dependencies itself."""
