"""The research's comparison as a product feature: methods x label settings x seeds.

Fast protocol (Cole et al. 2021, "linear, fixed features"): a frozen backbone's features are
computed once and cached, then a linear head is trained per cell in seconds.
"""
