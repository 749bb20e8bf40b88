"""Code that generates the collecting side's configuration (SLO rules) and the links it shares."""
