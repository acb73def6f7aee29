"""Callbacks for the frameworks people train with; each module imports its framework, this one none.

    from initdoctor.integrations.lightning import InitDoctorCallback      # pip install initdoctor[lightning]
    from initdoctor.integrations.transformers import InitDoctorCallback   # pip install initdoctor[transformers]
"""
