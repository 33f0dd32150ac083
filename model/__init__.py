"""seqserve.model"""
