"""seqserve.client"""
