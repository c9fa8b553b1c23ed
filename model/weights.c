/* placeholder */ typedef int pressd_placeholder_t;
