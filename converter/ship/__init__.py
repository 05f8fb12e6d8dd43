"""Ship: a gated file to GitHub releases, the catalog and OpenKara's pins (tags, budgets)."""
