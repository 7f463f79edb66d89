"""moeserve.chaos"""
