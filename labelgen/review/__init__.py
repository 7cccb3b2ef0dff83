"""Human review (FiftyOne App), evaluation against ground truth, and the HTML report."""
