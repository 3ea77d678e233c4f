"""cdiscount dataset."""
