"""Insights: after the model is published, what it learned and whom it may treat unequally.

    reports.py       the insights stage: explanations, then the bias report; settings checked at the start
    explanations.py  SHAP word attributions of test reviews (the shap library), JSON Lines and a page
    bias.py          Clarify's pre- and post-training bias metrics (AWS's smclarify), analysis.json

Imports the contract, data and model. Nothing here fails the job: an error is written into its report.
"""
