"""Pure money and statistics: prices and the catalog, cost models, break-evens, intervals, tests."""
