"""Research uses of a conditional run: the conditions a UNet learns from a participants table (table.py; the table
itself is read by participants.py) and the counterfactual "what if" images of `driver.py counterfactual`
(counterfactual.py)."""
