"""Teams (issue 23): groups of accounts; collections and grants build on them."""
