"""What runs mean side by side: sweep summaries over seeds, training curves, routing pictures."""
